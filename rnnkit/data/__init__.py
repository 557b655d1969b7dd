"""rnnkit.data: windowing, scaling, series loading (each engineer adds the imports of their modules)."""
from .scaling import Scaler, SeriesTransform
from .series import Series, airline, load_csv
from .windows import make_windows, target_starts
