import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Tiny models on a shared CPU run several times faster with one thread than oversubscribed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_terminal_summary(terminalreporter) -> None:
    """Print what passed tests recorded with ``record_property("summary", text)``, from xdist workers too."""
    for report in terminalreporter.stats.get("passed", []):
        for key, value in report.user_properties:
            if key == "summary":
                terminalreporter.write_line(f"{report.nodeid}: {value}")
