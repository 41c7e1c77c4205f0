"""One run: a model, its data and the delay engine trained to the end, resumably (single,
packed and multi-process runs), with its stop signals and W&B mirror. Imports ``abexp.sim``,
``abexp.data`` and the top-level ``config``/``io``; never ``abexp.lab`` or ``abexp.tools``."""
