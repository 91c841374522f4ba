"""`python -m fulltune.train`: the entry point of every training rank (recipe.py tells the story).

The process exit code tells the operator what to do (exit_codes.py has the table): 0 done; 1 bad
config, data or checkpoints (permanent); 2 unexpected error (permanent); 138 retryable
(distributed, network or storage failure: the restarted job resumes from its newest checkpoint).
"""

from fulltune._process import exit_now, stop_with_run_owner
from fulltune.train.recipe import main

stop_with_run_owner()
exit_now(main())
