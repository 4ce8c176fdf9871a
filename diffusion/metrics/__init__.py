"""Sample-quality metrics: :mod:`.fid` (FID/KID through torchmetrics, Inception from a local weights file or any
feature network) and :mod:`.classifier` (``fd_classifier``: the Frechet distance and KID on the penultimate features
of a small classifier trained on the dataset's own training split, offline). The NLL bound lives with the Gaussian
process (:meth:`GaussianDiffusion.calc_bpd_loop`)."""

from diffusion.metrics.fid import INCEPTION_FILE, INCEPTION_URL, fid_kid, inception, inception_weights

__all__ = ["INCEPTION_FILE", "INCEPTION_URL", "fid_kid", "inception", "inception_weights"]
