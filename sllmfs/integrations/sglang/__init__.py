"""SGLang integration: ``--load-format sllm``.

plugin.py registers the format through SGLang's plugin hooks (no SGLang files
touched); compat.py names the supported releases (0.5.17 to 0.5.23) and holds
each difference between them as one small adapter; loader.py is the model loader and fastpath.py its per-rank fast path;
variants.py names SGLang's per-rank cache entries; save.py runs SGLang to store
them; patch.py applies the optional SGLang patch. What is not SGLang's own
(write-back, locating the sidecar, weight sources, the copy beside the build) is
sllmfs.integrations.common. Nothing here imports SGLang at module import time
except loader.py and fastpath.py.
"""

LOAD_FORMAT = "sllm"
