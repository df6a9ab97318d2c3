"""A display window read from a config, a run or the command line is refused unless both numbers are finite."""

from __future__ import annotations

import numpy as np
import pytest

from medlens.errors import ConfigError
from medlens.io.windows import apply_window, parse_window


@pytest.mark.parametrize("window", ["40,nan", "nan/400", "40:inf", (40, float("nan")), (float("-inf"), 400)])
def test_non_finite_window_is_refused(window):
    with pytest.raises(ConfigError, match="finite"):
        parse_window(window)
    with pytest.raises(ConfigError):
        apply_window(np.zeros((4, 4), np.float32), window)


def test_finite_window_maps_level_to_the_middle():
    out = apply_window(np.array([-160.0, 40.0, 240.0], np.float32), "40,400")
    np.testing.assert_allclose(out, [0.0, 0.5, 1.0])
