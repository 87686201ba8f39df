"""The Hub metric Space of the `cider_d` evaluate module: evaluate's own metric widget."""

from pathlib import Path

import evaluate
from evaluate.utils import launch_gradio_widget

module = evaluate.load(str(Path(__file__).resolve().with_name("cider_d.py")))
launch_gradio_widget(module)
