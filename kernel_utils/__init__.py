"""kernel_utils: the shared engine of the RSNA 2022 cervical spine notebooks."""
