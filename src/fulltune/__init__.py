"""fulltune: full-parameter fine-tuning of causal language models as a Kubeflow Pipelines DAG."""

__version__ = "0.1.0"
