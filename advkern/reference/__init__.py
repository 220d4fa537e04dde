"""The pure-NumPy reference: the executable specification every backend is tested against.

- ``layers``: functional forward/backward of every layer;
- ``losses``: cross-entropy and the C&W margin from logits (log-sum-exp), per sample;
- ``network``: whole-model forward/backward, input gradients, logit Jacobians;
- ``projections``: L-inf / L2 / L1 balls (L1 exact, Duchi et al. 2008), the box, steepest steps;
- ``gradient_attacks``: FGSM, FGM-L2, BIM, PGD (L-inf, L2, L1; random start, restarts),
  MI-FGSM;
- ``deepfool``: DeepFool, multi-class, L2 and L-inf, batched;
- ``cw``: Carlini-Wagner L2 (tanh box, Adam, per-image binary search over c), batched;
- ``lbfgs``: Szegedy et al.'s box-constrained L-BFGS attack (projected L-BFGS), batched;
- ``jsma``: the Jacobian saliency map attack (pair-wise and single-feature);
- ``pixel``: the one-/few-pixel attack by differential evolution;
- ``linear``: exact worst cases, robust loss and robust training of binary linear models;
- ``metrics``: success, accuracy, perturbation norms, transferability.
"""

from . import (cw, deepfool, gradient_attacks, jsma, layers, lbfgs, linear, losses, metrics,
               network, pixel, projections)
from .gradient_attacks import bim, fgm_l2, fgsm, mi_fgsm, pgd
from .jsma import best_feature, best_pair, jsma as jsma_attack
from .linear import linear_attack, robust_loss, train_robust_linear
from .losses import cross_entropy, log_softmax, margin, predict, softmax
from .metrics import evaluate, transfer
from .network import backward, forward, jacobian, loss_and_input_grad, loss_and_param_grads
from .pixel import pixel_attack
from .projections import clip_box, project, project_l1, project_l2, project_linf, steepest_step

__all__ = ["gradient_attacks", "jsma", "layers", "linear", "losses", "metrics", "network",
           "pixel", "projections", "bim", "fgm_l2", "fgsm", "mi_fgsm", "pgd", "best_feature", "best_pair",
           "jsma_attack", "linear_attack", "robust_loss", "train_robust_linear",
           "cross_entropy", "log_softmax", "margin", "predict", "softmax", "evaluate",
           "transfer", "backward", "forward", "jacobian", "loss_and_input_grad",
           "loss_and_param_grads", "pixel_attack", "clip_box", "project", "project_l1",
           "project_l2", "project_linf", "steepest_step"]
