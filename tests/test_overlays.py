"""Overlays (issue 19): image, reference and prediction side by side with a legend naming the classes."""
import numpy as np

from experiments.predict import overlay_figure, overlay_slices


def volume():
    hu = np.full((40, 36, 12), -1000.0, dtype=np.float32)
    hu[4:36, 4:32, :] = 40.0
    labels = np.zeros(hu.shape, dtype=np.uint8)
    labels[6:18, 8:28, 2:10] = 2      # right lung (low RAS x)
    labels[22:34, 8:28, 2:10] = 1
    labels[10:14, 12:16, 5:7] = 3     # a lesion in the right lung
    hu[np.isin(labels, (1, 2))] = -850.0
    return hu, labels


def legend_texts(fig):
    return [t.get_text() for legend in fig.legends for t in legend.get_texts()]


def test_figure_has_image_reference_and_prediction_panels_and_a_legend():
    import matplotlib.pyplot as plt

    _, labels = volume()
    img = np.zeros((36, 40))
    fig = overlay_figure(img, labels[:, :, 5].T, labels[:, :, 6].T, 1.0, "case", note="implausible: lung 30 L")
    assert [ax.get_title() for ax in fig.axes] == ["image", "reference", "prediction"]
    assert legend_texts(fig) == ["right lung", "left lung", "lesion"]
    assert any(t.get_text() == "implausible: lung 30 L" for t in fig.texts)
    # the reference and prediction panels draw their classes' outlines; the image panel draws none
    assert not fig.axes[0].collections and fig.axes[1].collections and fig.axes[2].collections
    plt.close(fig)
    fig = overlay_figure(img, labels[:, :, 5].T, None, 1.0, "case")
    assert [ax.get_title() for ax in fig.axes] == ["image", "prediction"] and legend_texts(fig)
    plt.close(fig)


def test_overlay_pngs_pick_the_most_affected_slice(tmp_path):
    hu, labels = volume()
    affine = np.diag([2.0, 2.0, 5.0, 1.0])
    paths = overlay_slices(hu, labels, affine, tmp_path / "case", n=3, reference=labels)
    assert [p.name for p in paths] == ["case_overlay_1.png", "case_overlay_2.png"]  # two slices hold lesion
    assert all(p.stat().st_size > 1000 for p in paths) and not list(tmp_path.glob(".*tmp*"))
