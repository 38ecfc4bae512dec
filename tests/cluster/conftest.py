import pytest

from tests.cluster.harness import Cluster


@pytest.fixture
def cluster(tmp_path):
  """An empty local cluster; every process it starts is killed when the test ends, passed or failed."""
  c = Cluster(tmp_path)
  yield c
  c.close()
