"""Files: atomic writes, the packed .dfmpc container and its code layouts."""
