"""Training and evaluation data: one on-disk sample format (`sample`), and the builders that turn what users have
(captures, asset libraries, the preference log) into samples."""
