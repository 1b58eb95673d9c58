"""SGLang integration: ``--load-format sllm``.

plugin.py registers the format through SGLang's plugin hooks (no SGLang files
touched); loader.py is the model loader; variants.py names the per-rank cache
entries; locate.py finds the sidecar for a ``--model-path``; writeback.py stores
a rank's post-processed state; patch.py applies the optional SGLang patch.
Nothing here imports SGLang at module import time except loader.py.
"""

LOAD_FORMAT = "sllm"
