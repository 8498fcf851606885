"""The OpenAPI 3.1 document, generated from `api.ENDPOINTS` and the msgspec Structs they
name, so the spec describes exactly what is served."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, get_args

import msgspec

from . import models
from .models import Problem

REF = "#/components/schemas/{name}"
ERRORS = {400: "Malformed request", 401: "Missing or unknown API key",
          404: "No such resource for this tenant", 409: "Conflict with the current state",
          413: "Body over the size limit", 415: "Unsupported content type",
          422: "Invalid input", 503: "Storage unavailable"}


def _schema_of(endpoints: Iterable[Any]) -> tuple[dict[type, dict], dict[str, Any]]:
    types: set[type] = {Problem}
    for e in endpoints:
        types |= {t for t in (e.body, e.response) if isinstance(t, type)}
    ordered = sorted(types, key=lambda t: t.__name__)
    schemas, components = msgspec.json.schema_components(ordered, ref_template=REF)
    return dict(zip(ordered, schemas, strict=True)), components


def _content(media: str, schema: dict) -> dict:
    return {"content": {media: {"schema": schema}}}


def _parameters(e: Any) -> list[dict]:
    params = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
              for name in re.findall(r"{(\w+)}", e.path)]
    statuses = models.ItemStatus if e.path.endswith("/items") else models.BatchStatus
    query = {"status": {"type": "string", "enum": list(get_args(statuses))},
             "limit": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
             "after": {"type": "string"}}
    params += [{"name": name, "in": "query", "required": False, "schema": query[name]}
               for name in e.query]
    if e.status == 201:
        params.append({"name": "Idempotency-Key", "in": "header", "required": False,
                       "schema": {"type": "string", "minLength": 1, "maxLength": 255}})
    return params


def _request_body(e: Any, schemas: dict[type, dict]) -> dict | None:
    if e.body == "file":
        return {"required": True, "content": {
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["file"],
                "properties": {"file": {"type": "string", "format": "binary"}}}},
            "application/jsonl": {"schema": {"type": "string"}}}}
    if isinstance(e.body, type):
        return {"required": True, **_content("application/json", schemas[e.body])}
    return None


def _responses(e: Any, schemas: dict[type, dict]) -> dict:
    if isinstance(e.response, type):
        ok = _content("application/json", schemas[e.response])
    else:
        ok = _content(e.response, {"type": "string"} if e.response != "application/json"
                      else {"type": "object"})
    responses = {str(e.status): {"description": e.summary, **ok}}
    if e.auth:
        problem = _content("application/problem+json", schemas[Problem])
        for code, text in ERRORS.items():
            responses[str(code)] = {"description": text, **problem}
    return responses


def document(endpoints: list[Any]) -> dict[str, Any]:
    """The whole OpenAPI document for `endpoints`."""
    schemas, components = _schema_of(endpoints)
    paths: dict[str, dict] = {}
    for e in endpoints:
        op: dict[str, Any] = {"operationId": e.name, "summary": e.summary,
                              "parameters": _parameters(e), "responses": _responses(e, schemas)}
        body = _request_body(e, schemas)
        if body:
            op["requestBody"] = body
        if e.auth:
            op["security"] = [{"bearer": []}, {"apiKey": []}]
        paths.setdefault(e.path, {})[e.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "minibatch", "version": "1",
                 "description": "Batches of items, their results, and signed webhooks."},
        "paths": paths,
        "components": {"schemas": components, "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"}}},
    }
