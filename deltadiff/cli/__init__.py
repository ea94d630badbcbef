"""The two command lines, dd-run and dd-export (and dd-run bench): the top layer, imported by nothing."""
