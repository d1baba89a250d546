"""toolvlm.prompts."""
