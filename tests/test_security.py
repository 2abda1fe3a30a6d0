"""Optional API key authentication and CORS, both off unless configured."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
import pytest

from main import MAX_OTHER_BODY_BYTES, OPEN_PATHS
from service.settings import Settings
from tests.support import make_settings, running_app

API_KEY = "s3cret-key-for-tests"
ORIGIN = "https://app.example.com"


async def served_so_far(client: httpx.AsyncClient) -> float:
    """Requests the batcher has finished, in any outcome, according to /metrics."""
    text = (await client.get("/metrics")).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("batch_requests_total{")
    )


def upload(photo: Path) -> dict[str, tuple[str, bytes, str]]:
    return {"file": (photo.name, photo.read_bytes(), "image/jpeg")}


async def test_without_api_key_setting_no_key_is_needed(photos: list[Path]) -> None:
    async with running_app(make_settings()) as served:
        response = await served.client.post("/cls", files=upload(photos[0]))
    assert response.status_code == 200


async def test_a_401_closes_the_connection_only_for_a_long_body_it_left_unread() -> None:
    """A short body is read and dropped, and the connection serves the next request, as
    after a 404; a long one ends it (lingering, so the client gets the 401)."""
    async with running_app(make_settings(api_key=API_KEY)) as served:
        short = await served.client.post("/cls", files={"file": ("a.jpg", b"x" * 100)})
        long_data = b"x" * (MAX_OTHER_BODY_BYTES + 1)
        long = await served.client.post("/cls", files={"file": ("a.jpg", long_data)})
    assert short.status_code == long.status_code == 401
    assert "connection" not in short.headers
    assert long.headers["connection"] == "close"


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {API_KEY}"},
        {"X-API-Key": API_KEY[:-1]},
        {"X-API-Key": API_KEY + "x"},
    ],
    ids=["none", "wrong-bearer", "wrong-scheme", "prefix", "longer"],
)
async def test_a_missing_or_wrong_key_gets_401_before_the_body_is_read(
    headers: dict[str, str], photos: list[Path]
) -> None:
    async with running_app(make_settings(api_key=API_KEY)) as served:
        before = await served_so_far(served.client)
        response = await served.client.post("/cls", files=upload(photos[0]), headers=headers)
        after = await served_so_far(served.client)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert "API key" in response.json()["detail"]
    assert API_KEY not in response.text
    assert response.headers["x-request-id"]
    assert after == before  # refused at the door: nothing reached the batcher


async def test_a_401_to_a_request_without_a_body_keeps_the_connection() -> None:
    async with running_app(make_settings(api_key=API_KEY)) as served:
        response = await served.client.get(f"/task-status/{uuid.uuid4()}")
    assert response.status_code == 401
    assert "connection" not in response.headers


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": f"Bearer {API_KEY}"},
        {"X-API-Key": API_KEY},
        {"Authorization": f"Bearer {API_KEY} \t"},
        {"X-API-Key": f"{API_KEY} \t"},
        # A gateway's own token beside the client's key, and the other way round.
        {"Authorization": "Bearer gateway-token", "X-API-Key": API_KEY},
        {"Authorization": f"Bearer {API_KEY}", "X-API-Key": "other"},
    ],
    ids=[
        "bearer",
        "x-api-key",
        "bearer-trailing-blanks",
        "x-api-key-trailing-blanks",
        "other-bearer-and-x-api-key",
        "bearer-and-other-x-api-key",
    ],
)
async def test_the_right_key_is_accepted_either_way(
    headers: dict[str, str], photos: list[Path]
) -> None:
    async with running_app(make_settings(api_key=API_KEY)) as served:
        single = await served.client.post("/cls", files=upload(photos[0]), headers=headers)
        batch = await served.client.post(
            "/cls/batch",
            files=[("file", (p.name, p.read_bytes())) for p in photos],
            headers=headers,
        )
    assert single.status_code == 200
    assert batch.status_code == 200
    assert all(entry["status"] == 200 for entry in batch.json()["results"])


@pytest.mark.parametrize(
    "key",
    # The last two end in the UTF-8 bytes 0x85 and 0xA0, which str.strip() takes for space.
    ["cl\u00e9-\u00fcber-\u5bc6", "secret-key-\u0445", "cl\u00e9-\u00e0"],
)
async def test_a_non_ascii_key_is_accepted_as_utf8(key: str, photos: list[Path]) -> None:
    async with running_app(make_settings(api_key=key)) as served:
        right = await served.client.post(
            "/cls", files=upload(photos[0]), headers={"X-API-Key": key.encode()}
        )
        bearer = await served.client.post(
            "/cls", files=upload(photos[0]), headers={"Authorization": b"Bearer " + key.encode()}
        )
        wrong = await served.client.post(
            "/cls", files=upload(photos[0]), headers={"X-API-Key": key.encode("utf-16")}
        )
    assert right.status_code == 200, right.text
    assert bearer.status_code == 200, bearer.text
    assert wrong.status_code == 401


async def test_probes_metrics_and_the_documentation_stay_open() -> None:
    """A browser opening the documentation sends no key; its "Authorize" button is where a
    reader gives one, for the routes that need it."""
    async with running_app(make_settings(api_key=API_KEY)) as served:
        client = served.client
        for path in ("/healthz", "/readyz", "/metrics", "/docs", "/redoc"):
            assert (await client.get(path)).status_code == 200, path
        assert (await client.get("/docs/oauth2-redirect")).status_code == 200
        assert (await client.get("/nowhere")).status_code == 401
        opened = await client.get("/openapi.json")
        assert opened.status_code == 200
    # The documentation says how to send the key, and where it is needed.
    schema = opened.json()
    assert schema["components"]["securitySchemes"] == {
        "bearer": {"type": "http", "scheme": "bearer"},
        "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
    }
    keyed = [{"bearer": []}, {"apiKeyHeader": []}]
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            assert operation.get("security") == (None if path in OPEN_PATHS else keyed), path
            assert ("401" in operation["responses"]) == (path not in OPEN_PATHS), path


async def test_every_answer_tells_browsers_not_to_sniff_its_type(photos: list[Path]) -> None:
    """An error's detail can quote the request ("no task <id>"): labelled JSON, it must not
    be read as HTML."""
    async with running_app(make_settings(api_key=API_KEY)) as served:
        client = served.client
        key = {"X-API-Key": API_KEY}
        answers = [
            await client.post(
                "/cls", files={"file": ("a.jpg", photos[0].read_bytes())}, headers=key
            ),
            await client.get("/task-status/<script>", headers=key),
            await client.get("/nowhere"),  # 401
            await client.get("/docs"),
            await client.get("/metrics"),
        ]
    assert [answer.status_code for answer in answers] == [200, 404, 401, 200, 200]
    assert all(answer.headers["x-content-type-options"] == "nosniff" for answer in answers)


async def test_task_routes_need_the_key(photos: list[Path]) -> None:
    """Submitting, polling and cancelling tasks are all behind the key."""
    async with running_app(make_settings(api_key=API_KEY)) as served:
        client = served.client
        key = {"X-API-Key": API_KEY}
        assert (await client.post("/tasks", files=upload(photos[0]))).status_code == 401
        accepted = await client.post("/tasks", files=upload(photos[0]), headers=key)
        assert accepted.status_code == 202
        status_url = accepted.json()["status_url"]
        task_path = f"/tasks/{accepted.json()['task_id']}"
        assert (await client.get(status_url)).status_code == 401
        assert (await client.delete(task_path)).status_code == 401
        assert (await client.get(status_url, headers=key)).status_code == 200


def test_an_empty_api_key_means_no_authentication(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("API_KEY", "")
    assert Settings().api_key is None
    monkeypatch.setenv("API_KEY", API_KEY)
    settings = Settings()
    assert settings.api_key is not None
    assert API_KEY not in repr(settings)


async def test_cors_is_off_by_default() -> None:
    async with running_app(make_settings()) as served:
        simple = await served.client.get("/healthz", headers={"Origin": ORIGIN})
        preflight = await served.client.options(
            "/cls", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}
        )
    assert "access-control-allow-origin" not in simple.headers
    assert "access-control-allow-origin" not in preflight.headers


async def test_configured_origins_pass_cors_even_with_an_api_key(photos: list[Path]) -> None:
    settings = make_settings(cors_origins=f"{ORIGIN}, https://other.example.com", api_key=API_KEY)
    async with running_app(settings) as served:
        client = served.client
        preflight = await client.options(
            "/cls",
            headers={
                "Origin": ORIGIN,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "x-api-key",
            },
        )
        allowed = await client.post(
            "/cls", files=upload(photos[0]), headers={"Origin": ORIGIN, "X-API-Key": API_KEY}
        )
        foreign = await client.post(
            "/cls",
            files=upload(photos[0]),
            headers={"Origin": "https://evil.example.net", "X-API-Key": API_KEY},
        )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    exposed = allowed.headers["access-control-expose-headers"].lower()
    for header in ("x-request-id", "retry-after", "location", "idempotent-replayed"):
        assert header in exposed
    assert "access-control-allow-origin" not in foreign.headers


async def test_cors_preflight_allows_cancelling_tasks_with_an_idempotency_key() -> None:
    settings = make_settings(cors_origins=ORIGIN)
    async with running_app(settings) as served:
        cancel = await served.client.options(
            "/tasks/00000000-0000-0000-0000-000000000000",
            headers={"Origin": ORIGIN, "Access-Control-Request-Method": "DELETE"},
        )
        submit = await served.client.options(
            "/tasks",
            headers={
                "Origin": ORIGIN,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "idempotency-key",
            },
        )
    assert cancel.status_code == 200, cancel.text
    assert "DELETE" in cancel.headers["access-control-allow-methods"]
    assert submit.status_code == 200, submit.text


async def test_cors_preflight_allows_a_request_s_own_time_limit() -> None:
    async with running_app(make_settings(cors_origins=ORIGIN)) as served:
        preflight = await served.client.options(
            "/cls",
            headers={
                "Origin": ORIGIN,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "x-request-timeout-ms",
            },
        )
    assert preflight.status_code == 200, preflight.text


async def test_a_refused_cors_preflight_is_a_json_error() -> None:
    async with running_app(make_settings(cors_origins=ORIGIN)) as served:
        foreign = await served.client.options(
            "/cls",
            headers={"Origin": "https://evil.example.net", "Access-Control-Request-Method": "POST"},
        )
        method = await served.client.options(
            "/cls", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "PUT"}
        )
    assert foreign.status_code == 400
    assert foreign.json() == {
        "detail": "Disallowed CORS origin; CORS_ORIGINS lists the allowed origins"
    }
    assert "access-control-allow-origin" not in foreign.headers
    assert method.status_code == 400
    assert method.json() == {"detail": "Disallowed CORS method; the API takes GET, POST, DELETE"}
    assert method.headers["access-control-allow-origin"] == ORIGIN
