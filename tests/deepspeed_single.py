"""The preamble of the subprocess scripts that run real DeepSpeed in one process (world size 1, gloo):
a free port, the process group, DeepSpeed's CPU shared-memory op build skipped."""

PREAMBLE = r'''
import os, socket
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
_s = socket.socket(); _s.bind(("127.0.0.1", 0)); os.environ["MASTER_PORT"] = str(_s.getsockname()[1]); _s.close()
import torch, deepspeed
from scaling.train import skip_cpu_shm_build
skip_cpu_shm_build()
deepspeed.init_distributed(dist_backend="gloo")
'''
