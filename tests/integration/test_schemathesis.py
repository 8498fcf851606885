"""schemathesis over /openapi.json of a real server: no 500, no response off the schema."""

from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from minibatch.api import ENDPOINTS

# CI runs a bounded number of examples per operation; the soak in bench/ runs more.
# Left out: positive_data_acceptance, since a schema cannot say which kinds exist or
# which JSONL lines are items; the API answers those with a 422 naming the problem.
MAX_EXAMPLES = int(os.environ.get("MINIBATCH_SCHEMATHESIS_EXAMPLES", "25"))


@pytest.mark.parametrize(("method", "path"), [(e.method, e.path) for e in ENDPOINTS])
def test_no_server_errors_and_responses_match_the_schema(server, tenant, method, path):
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operation = schema[path][method]
    headers = {"Authorization": f"Bearer {server.key(tenant)}"}

    @given(case=operation.as_strategy())
    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def check(case):
        case.call_and_validate(headers=headers, excluded_checks=[positive_data_acceptance])

    check()
