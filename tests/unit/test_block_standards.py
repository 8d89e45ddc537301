"""Every block type meets the standards Prefect's own integrations are held to (the checks
prefect-aws runs for its blocks): a description, a documentation URL, a description ending in a
period on every field, a code example that imports and loads the block.

The logo check is left out: it downloads the image from the internet. The documentation-URL
check is expected to fail (strictly) until the project publishes its documentation at an address
the blocks can point to; then it must pass.
"""

from __future__ import annotations

from typing import Any

import pytest
from prefect.blocks.core import Block
from prefect.testing.standard_test_suites import BlockStandardTestSuite

from blocks.registry import ALL_BLOCK_TYPES


@pytest.mark.parametrize("block_type", ALL_BLOCK_TYPES, ids=lambda cls: cls.__name__)
class TestBlockStandards(BlockStandardTestSuite):
    @pytest.fixture
    def block(self, block_type: type[Block]) -> type[Block]:
        return block_type

    @pytest.mark.xfail(strict=True, reason="no published documentation site to link to yet")
    def test_has_a_documentation_url(self, block: type[Block]) -> None:
        super().test_has_a_documentation_url(block)

    #: Not collected: it fetches the logo over the network, and tests stay on loopback.
    test_has_a_valid_image: Any = None
