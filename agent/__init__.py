"""toolvlm.agent."""
