"""``make demo``: the embedded world end to end, zero-shot vs adapted, as a table and an HTML report.

Each section (:mod:`~vlprompt.demo.retrieval`, :mod:`~vlprompt.demo.rvlr`, :mod:`~vlprompt.demo.continual`,
:mod:`~vlprompt.demo.tta`, :mod:`~vlprompt.demo.cil`, :mod:`~vlprompt.demo.caption`) registers itself by name
(:func:`~vlprompt.demo.sections.register_section`), as methods do; :func:`~vlprompt.demo.run.run_demo` runs the
chosen ones. A new capability adds one section module here and one import line below.
"""

# isort: off
# Importing the section modules registers them; their order here is the order of the table and the report.
from vlprompt.demo import retrieval, rvlr, continual, tta, cil, caption, grounding  # noqa: F401
# isort: on

from vlprompt.demo.run import report, run_demo, section_panels
from vlprompt.demo.sections import DEFAULT_SECTIONS, SECTIONS, Row, register_section

__all__ = ["DEFAULT_SECTIONS", "SECTIONS", "Row", "register_section", "report", "run_demo", "section_panels"]
