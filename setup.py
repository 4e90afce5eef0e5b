"""tf_large_margin: large-margin training of deep networks for Keras 3 / TensorFlow."""

import setuptools

setuptools.setup(
    name="tf_large_margin",
    version="0.1.0",
    description=(
        "Large-margin losses (Elsayed et al. 2018) and related margin methods "
        "for Keras 3 on TensorFlow."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["tf_large_margin", "tf_large_margin.*"]),
    package_data={"tf_large_margin": ["data/*.gz", "data/README.md"]},
    python_requires=">=3.10",
    # Tested with TF 2.21 / Keras 3.15. No upper bounds: the few Keras internals
    # used are fenced in tf_large_margin/compat.py, tests/test_compat.py names the
    # Keras version that breaks one, and scripts/check_nightly.sh runs the tests
    # against tf-nightly / keras-nightly.
    install_requires=[
        "tensorflow>=2.20",
        "keras>=3.12",
        "tensorflow-datasets>=4.9",
        "numpy>=1.26",
        "absl-py>=2.0",
        "tensorboard>=2.20",  # the example scripts' TensorBoard logs
    ],
    extras_require={
        # The example scripts' plots (evaluate.py, paper_report.py).
        "examples": ["matplotlib>=3.8"],
        # hypothesis: the randomized property tests (tests/test_properties.py).
        "test": ["pytest>=8", "matplotlib>=3.8", "hypothesis>=6.100"],
        # The other Keras backends the output-layer losses run on (README,
        # "Backends"); tests/test_backends.py compares them with TensorFlow.
        # No pins: pick torch's CPU or CUDA build yourself.
        "jax": ["jax"],
        "torch": ["torch"],
        "backends": ["jax", "torch"],
    },
)
