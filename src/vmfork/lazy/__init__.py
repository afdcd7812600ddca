"""Templates on other hosts: publishing a template's files, and pulling one
whose memory arrives lazily (on first read, through FUSE) or eagerly."""
