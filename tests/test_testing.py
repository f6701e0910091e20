import httpx2
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from broker.testing import serve_app


async def test_serve_app_serves_on_loopback():
    app = Starlette(routes=[Route("/x", lambda r: PlainTextResponse("ok"))])
    async with serve_app(app) as url, httpx2.AsyncClient() as c:
        r = await c.get(url + "/x")
        assert r.text == "ok"
