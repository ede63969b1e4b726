"""Reports a person reads without the code: ``pages`` (HTML pieces: tables, plots, glossary, environment; used by
the runners' own ``report.html``, the demo and ``vlprompt report``) and ``runs`` (``vlprompt report`` over run
directories: runs grouped by setting, seeds as mean ± std, chance levels)."""
