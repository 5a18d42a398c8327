import os
import sys

from factorllm_ds.cli import main

if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # torch 2.13's gloo teardown can abort a rank at exit; a deliberate exit avoids it.
    if os.environ.get("FACTORLLM_DS_HARD_EXIT", "1") == "1" and "torch.distributed" in sys.modules:
        os._exit(code)
    sys.exit(code)
