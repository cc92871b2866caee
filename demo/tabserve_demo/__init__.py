"""The tabserve demo: a synthetic credit-scoring LightGBM model, its registration in MLflow, the embedded default
of `make run`, the `make demo` tour, and the child-process helpers that the tour, the tests and the bench share.

Importing the package imports nothing heavy: mlflow and lightgbm load only in the modules that train or register.
"""
