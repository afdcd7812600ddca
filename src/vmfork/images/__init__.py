"""Guest images vmfork builds itself: the busybox demo guest (:mod:`.demo`) and a
debootstrapped Debian disk (:mod:`.debian`); ``guestfs/`` holds the files both
put into the guest (init, serial agent, DHCP script)."""
