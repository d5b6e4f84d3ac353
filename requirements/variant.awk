# Selects what a variant installs from a hashed lock (uv pip compile's format):
#   awk -v variant=cpu -f requirements/variant.awk requirements/trainer.txt
# variant=cpu leaves out what only GPU code paths load: triton (torch.compile's GPU kernels) and
# the cuda-* Python bindings, 1 GB of the 6 GB install. The nvidia-* library wheels stay: PyPI's
# torch is a CUDA build whose libtorch_cpu.so/libtorch_cuda.so link them, so it cannot even be
# imported without them (docs/images.md). Any other variant (cuda) keeps every line. An entry
# starts on an unindented line; its hashes and "# via" comments are the indented lines below.
/^[^ #]/ { skip = variant == "cpu" && $1 ~ /^(cuda-|triton==)/ }
!skip
