"""vLLM integration: ``--load-format sllm`` (``vllm serve /mnt/sllm/<model> --load-format sllm``).

plugin.py registers the format through the ``vllm.general_plugins`` entry point (no vLLM files
touched); loader.py is the model loader. Everything that is not vLLM's own (variant keys,
write-back, weight sources, locating the sidecar, the copy) is sllmfs.integrations.common.
Nothing here imports vLLM at module import time except loader.py.
"""

from sllmfs.integrations.common.variants import Framework

LOAD_FORMAT = "sllm"
SUPPORTED_VERSIONS = ("0.26.0",)  # tested; others load with a warning at startup
VLLM = Framework("vllm", "vLLM")  # per-rank variant keys: vllm.tp2.r0.bfloat16.none.v0.26.0
