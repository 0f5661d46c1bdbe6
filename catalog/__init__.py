"""The model catalog shared by the CLIs and daemons."""
