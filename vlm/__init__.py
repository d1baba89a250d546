"""toolvlm.vlm."""
