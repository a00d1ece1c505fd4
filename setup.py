from setuptools import find_packages, setup

setup(
    name="kdjax",
    version="0.1.0",
    description="Knowledge distillation for generative models, in JAX: the GMM and SmolLM2 studies.",
    packages=find_packages(include=["kdjax", "kdjax.*", "experiments", "experiments.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.8.2",  # jax.lax.pcast (the fused heads under shard_map)
        "flax>=0.11",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "numpy",
        "absl-py",
        "matplotlib",
        "tqdm",
        "gguf>=0.16",
        "safetensors",
        "datasets>=3",
        "transformers>=4.50",
        # The SmolLM2 study's embedding map (--embedding_map=umap, the paper's choice); pulls
        # numba, pynndescent and scikit-learn. MAUVE (mauve-text) is optional, not listed: it
        # imports faiss.
        "umap-learn",
    ],
    extras_require={
        # Accelerators: the same jax with its GPU plugin (CUDA 12 wheels from PyPI) or with libtpu.
        # `pip install -e ".[cuda12]"` on an NVIDIA GPU machine, `pip install -e ".[tpu]"` on a TPU VM
        # (or on any Linux machine, to compile for TPU topologies: --dry_run --hardware=v5p-64,
        # bench_train --compile_only --topology=v5p:2x2x2).
        "cuda12": ["jax[cuda12]>=0.8.2"],
        "tpu": ["jax[tpu]>=0.8.2"],
        "test": [
            "pytest",
            "pytest-xdist",  # the README's test command runs two workers
            "scipy",
            "scikit-learn",
            # Test-only reference implementation (transformers' LlamaForCausalLM). Pinned: this is a
            # CPU build; an unpinned torch pulls a multi-GB CUDA build.
            "torch==2.13.0",
            "accelerate",
            # Reads kdjax.events' TensorBoard files back with its own protocol buffers and CRC.
            "tensorboardX",
            # The TPU compiler (libtpu, paired with jax's version): tests compile the train step
            # and a tiny study for TPU topologies on the CPU (kdjax.compiled.tpu_devices); a
            # 213 MB wheel, 684 MB installed (~8 s from a local wheel). Without it those tests
            # are skipped.
            "jax[tpu]>=0.8.2",
        ],
    },
)
