"""Experiments on top of lbyl: the lab, kept apart from the library.

Nothing here is installed with the package, and everything here uses the public
API of :mod:`lbyl` only. Run the experiments from the repository root:

- ``python -m benchmarks.cifar10_resnets --help``: the CIFAR-10 ResNet benchmark
  (results tracked in ``benchmarks/cifar10/``, report in ``docs/benchmarks.md``);
- ``python -m benchmarks.reproduce_lenet``: the paper's LeNet-300-100 table
  (``docs/reproduction.md``);
- ``python -m benchmarks.ablation``: the ablation of the default restoration
  (``docs/ablation.md``);
- ``python -m benchmarks.coverage --doc docs/architectures.md`` (needs torchvision):
  every torchvision classification architecture through ``lbyl.restore``
  (results tracked in ``benchmarks/coverage/``, report in ``docs/architectures.md``);
- ``python -m benchmarks.vit_mlp --doc docs/transformers.md`` (needs torchvision): the MLP
  hidden neurons of the small ViT that ships with lbyl, removed with prune, nm and lbyl
  (results tracked in ``benchmarks/vit/``, report in ``docs/transformers.md``);
- ``python -m benchmarks.imagenet_lite0``: EfficientNet-Lite0 on 1,000 ImageNet samples
  (results tracked in ``benchmarks/imagenet/``, report in ``docs/imagenet.md``).
"""
