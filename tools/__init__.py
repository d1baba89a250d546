"""toolvlm.tools."""
