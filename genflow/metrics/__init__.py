"""Sample-quality metrics: Fréchet distance (FID; FD_DINOv2 with the DINOv2 extractor), running feature
statistics, KID, improved precision/recall (``precision_recall.py``), feature extractors (TF-Inception via
clean-fid, DINOv2 ViT-L/14 via timm, a digits classifier, any nn.Module) and cached reference
statistics (``fid.py``, ``features.py``, ``reference.py``, ``evaluation.py``), and the sliced
Wasserstein distance for vector data (``sliced.py``)."""
from genflow.metrics.features import (
    DigitsClassifier,
    DigitsFeatures,
    DINOv2Features,
    InceptionFeatures,
    ModuleFeatures,
    build_feature_extractor,
    extract_features,
    resolve_inception_path,
)
from genflow.metrics.evaluation import FIDEvaluator, evaluate_fid
from genflow.metrics.fid import FeatureStats, fid_from_features, frechet_distance, kernel_distance
from genflow.metrics.reference import ReferenceStats, load_reference, reference_stats
from genflow.metrics.precision_recall import precision_recall
from genflow.metrics.sliced import sliced_wasserstein

__all__ = [
    "DigitsClassifier", "DigitsFeatures", "DINOv2Features", "FIDEvaluator", "FeatureStats", "InceptionFeatures", "ModuleFeatures", "ReferenceStats",
    "build_feature_extractor", "evaluate_fid", "extract_features", "fid_from_features", "frechet_distance", "kernel_distance",
    "load_reference", "precision_recall", "reference_stats", "resolve_inception_path", "sliced_wasserstein",
]
