"""toolvlm.finetune."""
