"""
A synchronous client of the control API (L{dtable.api}), on the standard
library only: no reactor, so scripts, notebooks and the command line can use
it as they are.

    client = ApiClient("http://127.0.0.1:8080", token)
    answer = client.add({"name": "www"}, wait=True)
    for item in client.iter_objects():
        print(item["hash"], item["object"])
    for event, data in client.events(snapshot=True):
        ...

This module owns HTTP, the bearer token, paging and the parsing of the
Server-Sent Events stream; it knows nothing of the node's rules (only the
master changes the table): it reports the node's answers, and turns every
failure into an L{ApiClientError}. It never uses the environment's HTTP
proxies: they would see the token.
"""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from http import HTTPStatus
from typing import Any, Iterable, Iterator
from urllib.parse import quote, urlencode, urlsplit

#: Objects in one page of L{ApiClient.list}, as the node's own default.
PAGE_SIZE = 100
#: Seconds an event stream may stay silent: the node sends a keep-alive
#: comment every 15 seconds.
EVENT_IDLE_TIMEOUT = 60.0
#: The address of a node's API when none is given.
DEFAULT_API = "http://127.0.0.1:8080"

_NO_BODY = object()


class ApiClientError(Exception):
    """
    A request to the node's API failed; C{str(error)} says why, in one line.
    """


class NodeUnreachable(ApiClientError):
    """
    No answer from the node: refused, timed out or cut off.

    @ivar url: the API's base URL.
    @ivar reason: what went wrong, as the operating system or HTTP library
        put it.
    """

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"cannot reach the node at {url}: {reason}")
        self.url = url
        self.reason = reason


class RequestFailed(ApiClientError):
    """
    The node answered with an HTTP error.

    @ivar status: the HTTP status code.
    @ivar error: the node's explanation (the C{"error"} of its JSON answer).
    """

    def __init__(self, status: int, error: str, text: str | None = None) -> None:
        super().__init__(text or f"the node answered HTTP {status} "
                                 f"({_phrase(status)}): {error}")
        self.status = status
        self.error = error


class Unauthorized(RequestFailed):
    """
    The node refused the token (HTTP 401).
    """

    def __init__(self, error: str) -> None:
        super().__init__(401, error, f"the node refused the token (HTTP 401): {error}")


def api_url(text: str) -> str:
    """
    The base URL of an API given as a URL, as C{HOST:PORT}, or as a bare port
    (on 127.0.0.1, as C{twistd dtable --api PORT} listens).

    @raises ValueError: for a URL that is not http or https.
    """
    text = text.strip()
    if text.isdigit():
        return f"http://127.0.0.1:{text}"
    url = text if "://" in text else "http://" + text
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{text!r} is not an http:// or https:// URL of a node's API")
    return url.rstrip("/")


class ApiClient:
    """
    Talks to one node's control API, one blocking request at a time.

    @param base_url: the API's address, e.g. C{http://127.0.0.1:8080}.
    @param token: the bearer token (the content of the node's
        C{--api-token-file}).
    @param timeout: seconds to wait for the node to connect and to answer.

    Every method raises L{NodeUnreachable} when the node does not answer,
    L{Unauthorized} when it refuses the token, and L{RequestFailed} for any
    other HTTP error (403 on a node that is not the master, 404 for an
    unknown hash, 400 for what is not a table object, ...).
    """

    def __init__(self, base_url: str, token: str, timeout: float = 30) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token.strip()
        self.timeout = timeout
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    # The table ---------------------------------------------------------------------

    def add(self, obj_or_list: Any, wait: bool = False) -> dict[str, Any]:
        """
        Add an object, or every object of a list (master only).

        @param wait: answer only once the change is published.
        @returns: C{{"hash": H}} for an object, C{{"hashes": [H, ...]}} for
            a list; with C{wait}, also C{"rev"}, the revision that holds it.
        @raises ValueError: if C{obj_or_list} is not JSON (NaN, a set, ...).
        """
        return self._json("POST", "/objects", obj_or_list, query=_wait(wait))

    def remove(self, object_hash: str, wait: bool = False) -> dict[str, Any]:
        """
        Remove the object C{object_hash} (master only).

        @param wait: answer only once the change is published.
        @returns: C{{"hash": H}}; with C{wait}, also C{"rev"}.
        """
        return self._json("DELETE", "/objects/" + quote(object_hash, safe=""),
                          query=_wait(wait))

    def get(self, object_hash: str) -> Any:
        """
        The object C{object_hash}; L{RequestFailed} with status 404 if the
        table does not hold it.
        """
        return self._json("GET", "/objects/" + quote(object_hash, safe=""))["object"]

    def list(self, after: str = "", limit: int = PAGE_SIZE) -> dict[str, Any]:
        """
        One page of the table, in hash order.

        @param after: the page starts after this hash (C{""}: at the start).
        @param limit: objects in the page at most (the node allows 1-10000).
        @returns: C{{"objects": [{"hash": H, "object": O}, ...], "next":
            HASH or None, "count": N, "rev": R}}: C{next} is the C{after} of
            the next page; C{count} and C{rev} describe the whole table when
            the page was read.
        """
        return self._json("GET", "/objects", query={"after": after, "limit": limit})

    def iter_objects(self, page_size: int = PAGE_SIZE) -> Iterator[dict[str, Any]]:
        """
        Every object of the table as C{{"hash": H, "object": O}}, in hash
        order, a page of C{page_size} at a time. Pages are read as they are
        needed: a table that changes meanwhile is not read at one revision.
        """
        after = ""
        while True:
            page = self.list(after, page_size)
            yield from page["objects"]
            if page["next"] is None:
                return
            after = page["next"]

    # Messages, events, the node --------------------------------------------------------

    def send(self, body: Any) -> dict[str, Any]:
        """
        Send C{body}, any JSON value, to every node online.

        @returns: C{{"id": MESSAGE_ID}}.
        """
        return self._json("POST", "/messages", body)

    def send_many(self, bodies: list[Any]) -> dict[str, Any]:
        """
        Send each of C{bodies} as its own message, in one request.

        @returns: C{{"ids": [MESSAGE_ID, ...]}}.
        """
        return self._json("POST", "/messages", bodies, query={"list": 1})

    def status(self) -> dict[str, Any]:
        """
        The node at a glance: id, head, links, known nodes, the overlay, the
        firewall, traffic (see L{dtable.service.DistributedTable.status}).
        """
        return self._json("GET", "/status")

    def metrics(self) -> str:
        """
        The node's metrics in the Prometheus text format.
        """
        with self._open("GET", "/metrics") as response:
            return self._read(response).decode("utf-8")

    def events(self, snapshot: bool = False,
               idle_timeout: float = EVENT_IDLE_TIMEOUT) -> Iterator[tuple[str, Any]]:
        """
        Follow the node's events. The stream is opened now (so a wrong token
        or an unreachable node raises here); the generator returned yields
        C{(event, data)} with C{data} decoded from JSON, until the node ends
        the stream. Close the generator (or leave its loop) to disconnect.

        @param snapshot: start with the whole table (C{object_added} events)
            and a C{ready} event, then what happens next.
        @param idle_timeout: seconds without a byte from the node after which
            the stream counts as lost (L{NodeUnreachable}).
        """
        query = {"snapshot": "1"} if snapshot else None
        response = self._open("GET", "/events", query=query, timeout=idle_timeout,
                              accept="text/event-stream")
        return self._follow(response, idle_timeout)

    def _follow(self, response: http.client.HTTPResponse,
                idle_timeout: float) -> Iterator[tuple[str, Any]]:
        try:
            for name, data in read_events(_lines(response)):
                yield name, _decode(data)
        except TimeoutError:
            raise NodeUnreachable(self.base_url, "the event stream was silent for "
                                                 f"{idle_timeout:g} seconds") from None
        except (OSError, http.client.HTTPException) as e:
            raise NodeUnreachable(self.base_url, _describe(e)) from None
        finally:
            response.close()

    # HTTP ------------------------------------------------------------------------------

    def _json(self, method: str, path: str, body: Any = _NO_BODY,
              query: dict[str, Any] | None = None) -> Any:
        with self._open(method, path, body, query) as response:
            raw = self._read(response)
        try:
            return json.loads(raw.decode("utf-8"))
        except ValueError:
            raise ApiClientError(f"the node at {self.base_url} did not answer JSON: "
                                 f"{_excerpt(raw)}") from None

    def _open(self, method: str, path: str, body: Any = _NO_BODY,
              query: dict[str, Any] | None = None, timeout: float | None = None,
              accept: str = "application/json") -> http.client.HTTPResponse:
        url = self.base_url + path + (f"?{urlencode(query)}" if query else "")
        headers = {"Authorization": f"Bearer {self.token}", "Accept": accept}
        data = None
        if body is not _NO_BODY:
            data = json.dumps(body, ensure_ascii=False, allow_nan=False).encode("utf-8")
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            return self._opener.open(request, timeout=timeout or self.timeout)
        except urllib.error.HTTPError as e:
            with e:
                raise _http_error(e) from None
        except urllib.error.URLError as e:
            raise NodeUnreachable(self.base_url, _describe(e.reason)) from None
        except (OSError, http.client.HTTPException) as e:
            raise NodeUnreachable(self.base_url, _describe(e)) from None

    def _read(self, response: http.client.HTTPResponse) -> bytes:
        try:
            return response.read()
        except (OSError, http.client.HTTPException) as e:
            raise NodeUnreachable(self.base_url, _describe(e)) from None


def read_events(lines: Iterable[str]) -> Iterator[tuple[str, str]]:
    """
    Parse a Server-Sent Events stream, given as its lines: yields
    C{(event, data)} for every event, C{event} C{"message"} when the stream
    names none, C{data} the event's data lines joined by newlines. Comments
    (lines starting with a colon), C{id} and C{retry} are skipped, as are an
    event without data and an unfinished event at the end.
    """
    name = ""
    data: list[str] = []
    for line in lines:
        line = line.removesuffix("\n").removesuffix("\r")
        if not line:
            if data:
                yield name or "message", "\n".join(data)
            name, data = "", []
            continue
        if line.startswith(":"):
            continue
        field, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if field == "event":
            name = value
        elif field == "data":
            data.append(value)


def _lines(response: http.client.HTTPResponse) -> Iterator[str]:
    """
    The lines of C{response}, without their line feeds, read as they come
    (whatever one read gives) and split in bulk: a readline() per line of
    a chunked response cost more than parsing the events.
    """
    # The start of an unfinished line, in pieces: a long line (a large
    # message's data) is joined once, not once per read.
    pending: list[bytes] = []
    while True:
        data = response.read1(65536)
        if not data:
            if pending:
                yield b"".join(pending).decode("utf-8", "replace")
            return
        if b"\n" not in data:
            pending.append(data)
            continue
        complete = data.split(b"\n")
        if pending:
            pending.append(complete[0])
            complete[0] = b"".join(pending)
        last = complete.pop()
        pending = [last] if last else []
        for line in complete:
            yield line.decode("utf-8", "replace")


def _decode(data: str) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return data


def _wait(wait: bool) -> dict[str, str] | None:
    return {"wait": "1"} if wait else None


def _http_error(error: urllib.error.HTTPError) -> RequestFailed:
    try:
        raw = error.read()
    except (OSError, http.client.HTTPException):
        raw = b""
    try:
        message = json.loads(raw.decode("utf-8"))["error"]
    except (ValueError, TypeError, KeyError):
        message = _excerpt(raw) or _phrase(error.code)
    if error.code == 401:
        return Unauthorized(str(message))
    return RequestFailed(error.code, str(message))


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "unknown status"


def _describe(reason: Any) -> str:
    if isinstance(reason, TimeoutError):
        return "timed out"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason) or type(reason).__name__


def _excerpt(raw: bytes, size: int = 200) -> str:
    text = " ".join(raw.decode("utf-8", "replace").split())
    return text if len(text) <= size else text[:size] + "..."
