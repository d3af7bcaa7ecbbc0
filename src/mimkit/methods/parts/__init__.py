"""Parts that several methods share, one per file (lightly's layout): a method file composes them and keeps only
what is its own. Parts sit above `models` and `data` and below the methods; none imports a method.

- `teacher.MomentumTeacher`: a no-gradient copy of a module, updated as an EMA on the schedule of `mimkit.ema`;
- `infonce.info_nce`: InfoNCE of queries against keys, optionally gathered from every process;
- `heads`: projector / predictor MLPs (MoCo v3's BatchNorm MLP, a LayerNorm MLP);
- `dino_head.DINOHead`, `centring.TeacherCentre`: DINO's head and its running centre of the teacher's outputs;
- `color.ViewColour`: the colour perturbation each `View` states (`View.color`), applied on the device.
"""

from .centring import TeacherCentre
from .color import ViewColour, perturb_views
from .dino_head import DINOHead
from .heads import bn_mlp, ln_mlp
from .infonce import gather_keys, info_nce
from .teacher import MomentumTeacher

__all__ = [
    "DINOHead",
    "MomentumTeacher",
    "TeacherCentre",
    "ViewColour",
    "bn_mlp",
    "gather_keys",
    "info_nce",
    "ln_mlp",
    "perturb_views",
]
