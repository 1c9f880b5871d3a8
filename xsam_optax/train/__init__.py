"""The ``xsam-train`` CLI and its parts: offline data, Flax models, the training protocol.

Example (shell)::

  python -m pip install -e '.[train]' && xsam-train

Modules: ``data`` (MNIST-1D, scikit-learn digits), ``models`` (CNN with
BatchNorm, MLP), ``optimizers`` (SGD, SAM, X-SAM and Eigen-SAM on one base:
``make_optimizer``), ``loop`` (the jitted step and the shared protocol),
``report`` (metrics.json, curves.png, the table), ``cli`` (argument parsing).
"""
