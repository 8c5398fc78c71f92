"""Shape-annotated tensor aliases shared by every stage."""

from jaxtyping import Bool, Float
from torch import Tensor

Pose = Float[Tensor, "*batch 6"]
RotVec = Float[Tensor, "*batch 3"]
RotMat = Float[Tensor, "*batch 3 3"]
Landmarks2D = Float[Tensor, "*batch n_landmarks 2"]
Landmarks3D = Float[Tensor, "*batch n_landmarks 3"]
Weights = Float[Tensor, "*batch n_landmarks"]
Visibility = Bool[Tensor, "*batch n_landmarks"]
Heatmaps = Float[Tensor, "batch n_landmarks height width"]
Images = Float[Tensor, "batch channels height width"]
