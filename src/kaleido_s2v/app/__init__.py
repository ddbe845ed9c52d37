"""`kaleido-s2v app`: a Gradio page (and the `/generate` API) over the batch runner, for the `[app]` extra.

`runner.py` holds the model (loaded once) and turns one request into one batch-runner case; `server.py` builds the
page and launches it; `messages.py` says the runner's errors in the page's words. Importing this package switches
Gradio's analytics off before Gradio is imported (nothing here may reach the network).
"""

import os

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # also stops Gradio's version check at launch
os.environ.setdefault("HF_HUB_OFFLINE", "1")
