import os
import sys

import torch

# Triton kernels run under the interpreter on CPU tensors when no GPU is present; the variable must
# be set before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))
