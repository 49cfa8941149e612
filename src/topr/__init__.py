"""topr: Tapered Off-Policy REINFORCE fine-tuning for language models.

The library holds all logic and imports no Kubeflow code; ``components/`` wraps its stages for
Kubeflow Pipelines and ``pipelines/`` wires them into the iterated loop.
"""

__version__ = "0.1.0"
