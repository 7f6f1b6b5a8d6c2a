"""Remote pictures: off by default; when on, fetched with the size limit and a timeout, and never from (or
redirected to) loopback, private or link-local addresses — checked on every hop, through the real client."""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path

import openai
import pytest
from aiohttp import web
from openai_helpers import png, running_api, user

from adapters.openai_api.images import is_public_address
from tests.scripted_backend import ScriptedBackend

PUBLIC_STANDIN = ipaddress.ip_address("127.0.0.2")
"""In these tests the picture server on 127.0.0.2 plays a public host: the policy allows it and nothing else."""


@pytest.mark.parametrize(
    ("address", "public"),
    [("127.0.0.1", False), ("10.1.2.3", False), ("192.168.0.9", False), ("172.16.0.1", False),
     ("169.254.169.254", False), ("100.64.0.1", False), ("0.0.0.0", False), ("224.0.0.1", False), ("::1", False),
     ("fe80::1", False), ("fc00::1", False), ("::ffff:127.0.0.1", False), ("::ffff:10.0.0.1", False),
     ("8.8.8.8", True), ("2606:4700:4700::1111", True), ("::ffff:8.8.8.8", True)],
)  # fmt: skip
def test_only_public_addresses_are_fetched_from(address: str, public: bool) -> None:
    assert is_public_address(ipaddress.ip_address(address)) is public


async def _picture_servers(hits: list[str]) -> tuple[web.AppRunner, int, web.AppRunner, int]:
    """A 'public' server on 127.0.0.2 (pictures, redirects, a slow and a huge answer) and a 'secret' one
    on 127.0.0.1 that must never be reached."""
    secret_port: list[int] = []

    async def picture(request: web.Request) -> web.Response:
        hits.append(f"public {request.path}")
        return web.Response(body=png((0, 90, 0)), content_type="image/png")

    async def redirect(request: web.Request) -> web.Response:
        hits.append(f"public {request.path}")
        target = {"to-loopback": f"http://127.0.0.1:{secret_port[0]}/secret.png",
                  "to-localhost": f"http://localhost:{secret_port[0]}/secret.png",
                  "to-metadata": "http://169.254.169.254/latest/meta-data/",
                  "to-self": "/picture.png", "loop": "/r/loop"}[request.match_info["kind"]]  # fmt: skip
        raise web.HTTPFound(target)

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response(body=png())

    async def huge(request: web.Request) -> web.Response:
        return web.Response(body=b"\x89PNG" + b"\0" * (600 * 1024), content_type="image/png")

    async def secret(request: web.Request) -> web.Response:
        hits.append(f"secret {request.path}")
        return web.Response(body=png())

    public = web.Application()
    public.router.add_get("/picture.png", picture)
    public.router.add_get("/r/{kind}", redirect)
    public.router.add_get("/slow.png", slow)
    public.router.add_get("/huge.png", huge)
    private = web.Application()
    private.router.add_get("/{tail:.*}", secret)
    runners = []
    for app, host in ((public, "127.0.0.2"), (private, "127.0.0.1")):
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, host, 0).start()
        runners.append((runner, runner.addresses[0][1]))
    secret_port.append(runners[1][1])
    return runners[0][0], runners[0][1], runners[1][0], runners[1][1]


def test_remote_pictures_are_fetched_safely_when_enabled(tmp_path: Path) -> None:
    async def main() -> None:
        hits: list[str] = []
        pub, pub_port, sec, sec_port = await _picture_servers(hits)
        backend = ScriptedBackend()
        options = {"fetch_remote_images": True, "fetch_timeout_s": 1.0, "max_redirects": 2}
        settings = {"images": {"max_bytes": 256 * 1024}}
        try:
            async with running_api(tmp_path, backend, settings, options,
                                   address_allowed=lambda a: a == PUBLIC_STANDIN) as api:  # fmt: skip
                chat = api.client().chat.completions
                base = f"http://127.0.0.2:{pub_port}"
                ok = await chat.create(model="minigpt4", messages=[user("what?", f"{base}/picture.png")])
                assert ok.choices[0].message.content and backend.calls[-1]["images"] == [png((0, 90, 0))]
                followed = await chat.create(model="minigpt4", messages=[user("again", f"{base}/r/to-self")])
                assert followed.choices[0].message.content  # a redirect to an allowed address is followed

                refused = {
                    f"http://127.0.0.1:{sec_port}/secret.png": "not one I fetch from",
                    f"http://localhost:{sec_port}/secret.png": "not one I fetch from",
                    f"http://[::1]:{sec_port}/secret.png": "not one I fetch from",
                    f"{base}/r/to-loopback": "not one I fetch from",
                    f"{base}/r/to-localhost": "not one I fetch from",
                    f"{base}/r/to-metadata": "not one I fetch from",
                    f"{base}/r/loop": "redirects",
                    f"{base}/slow.png": "longer than",
                    f"{base}/huge.png": "larger than",
                    "ftp://127.0.0.2/picture.png": "data: URL or an http(s) URL",
                }
                for url, why in refused.items():
                    with pytest.raises(openai.BadRequestError) as bad:
                        await chat.create(model="minigpt4", messages=[user("what?", url)])
                    assert why in bad.value.response.json()["error"]["message"], url
                assert not [h for h in hits if h.startswith("secret")], hits
                assert len(backend.calls) == 2
        finally:
            await pub.cleanup()
            await sec.cleanup()

    asyncio.run(main())


def test_the_production_policy_refuses_loopback(tmp_path: Path) -> None:
    async def main() -> None:
        hits: list[str] = []
        pub, pub_port, sec, sec_port = await _picture_servers(hits)
        try:
            async with running_api(tmp_path, ScriptedBackend(), openai={"fetch_remote_images": True}) as api:
                for url in (f"http://127.0.0.1:{sec_port}/x.png", f"http://127.0.0.2:{pub_port}/picture.png"):
                    with pytest.raises(openai.BadRequestError):
                        await api.client().chat.completions.create(model="minigpt4", messages=[user("q", url)])
            assert hits == []
        finally:
            await pub.cleanup()
            await sec.cleanup()

    asyncio.run(main())
