"""Templates, their copy-on-write clones, and the pool of processes for them.

A template is a VM frozen at one instant: its device state (saved with
``x-ignore-shared``, so RAM is not written), its memory file (read-only
from then on) and its disk overlays. A clone maps that memory file
privately and loads the state. The modules, each with one job; import the
one you need (``from vmfork.templates import clone``):

* :mod:`~vmfork.templates.manifest`: :class:`TemplateManifest` (frozen,
  versioned; reads the manifests older versions wrote), the checks before a
  template is used, and the spec of a new clone.
* :mod:`~vmfork.templates.create`: freeze a running VM into a template
  (fsfreeze around the pause, chained templates from clones), and the demo
  template (``create_from_vm``, ``create_demo``); the name reserved first,
  and a failed creation finished or undone (``reserved``, ``resolve``).
* :mod:`~vmfork.templates.clone`: start clones, give each its own identity,
  run the on-clone hook (``clone``).
* :mod:`~vmfork.templates.pool`: pool members (cold or warm), the pool's
  target and status, filling it once and keeping it filled (``set_pool``,
  ``fill_pool``, ``keep``, ``pool_status``).
* :mod:`~vmfork.templates.catalog`: look templates up, who uses them, the
  ``template ls`` rows, the template's lock, and removing one, crash-safely
  (``get``, ``users``, ``children_of``, ``statuses``, ``locked``,
  ``remove``, ``finish_removal``).
* :mod:`~vmfork.templates.recovery`: finish or undo a creation or removal
  whose vmfork died (``settle``, ``settle_all``, ``settle_vm``).

Arrows point down: recovery -> create -> catalog -> pool -> manifest;
clone -> pool. The library never runs the CLI.
"""
