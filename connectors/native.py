"""Native connector: in-process Python functions served as MCP tools. Never imports `broker`.

```python
tools = ToolSet()

@tools.tool
async def add(a: int, b: int = 1) -> int:
    "Add two integers."
    return a + b
```

The input schema comes from the type hints (pydantic), arguments are validated before the
function runs (unknown names are refused), and the return value becomes a `CallToolResult`:
``str`` is text; a dict or pydantic model is ``structured_content`` plus its JSON as text; any
other JSON-able value is ``{"result": value}``; a `CallToolResult` passes through. Raise
`ToolError` to send a message to the caller; any other exception becomes ``"tool 'x' failed"``
(logged here with its traceback, never sent). An async tool may take a parameter annotated
`Progress` to report progress. Sync tools run in a worker thread; on a deadline the thread is
abandoned, not stopped.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, Self, TypeVar, get_type_hints, overload

import anyio
import anyio.to_thread
import mcp.types as types
from pydantic import BaseModel, ConfigDict, ValidationError, create_model
from pydantic_core import PydanticSerializationError, to_jsonable_python

from connectors._mcp import call_deadline
from connectors.base import ChangeListener, JSONValue, NativeSpec, ProgressCallback
from connectors.errors import (
    CallTimeout,
    ConnectorClosed,
    ConnectorConfigError,
    DownstreamError,
)

__all__ = ["NativeConnector", "NativeTool", "Progress", "ToolError", "ToolSet"]

logger = logging.getLogger("connectors.native")

F = TypeVar("F", bound=Callable[..., Any])

INVALID_PARAMS = -32602


class ToolError(Exception):
    """Raise from a native tool: the message is sent to the caller in an ``is_error`` result."""


class Progress:
    """Injected into an async tool that declares a parameter of this type; reports progress."""

    def __init__(self, callback: ProgressCallback | None = None) -> None:
        self._callback = callback

    async def __call__(
        self, progress: float, total: float | None = None, message: str | None = None
    ) -> None:
        if self._callback is not None:
            await self._callback(progress, total, message)


@dataclass(frozen=True, slots=True)
class NativeTool:
    """One registered function and the MCP definition derived from it."""

    definition: types.Tool
    function: Callable[..., Any]
    arguments: type[BaseModel]
    progress_parameter: str | None
    is_async: bool

    async def run(
        self, arguments: Mapping[str, JSONValue], progress: ProgressCallback | None
    ) -> types.CallToolResult:
        """Validate ``arguments``, run the function, shape its result; a tool bug is a result."""
        name = self.definition.name
        try:
            parsed = self.arguments.model_validate(dict(arguments))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}"
                for err in exc.errors(include_url=False, include_input=False)
            )
            return _error(f"invalid arguments for tool '{name}': {problems}")
        kwargs = {field: getattr(parsed, field) for field in type(parsed).model_fields}
        if self.progress_parameter is not None:
            kwargs[self.progress_parameter] = Progress(progress)
        try:
            if self.is_async:
                value = await self.function(**kwargs)
            else:
                value = await anyio.to_thread.run_sync(
                    partial(self.function, **kwargs), abandon_on_cancel=True
                )
            return _shape(value)
        except ToolError as exc:
            return _error(str(exc))
        except Exception:  # the tool's own bug: logged here, a plain message goes out
            logger.exception("native tool failed", extra={"tool": name})
            return _error(f"tool '{name}' failed")


class ToolSet:
    """A registry of native tools; serve it with `NativeConnector`."""

    def __init__(self) -> None:
        self._tools: dict[str, NativeTool] = {}

    @overload
    def tool(self, function: F, /) -> F: ...

    @overload
    def tool(
        self,
        /,
        *,
        name: str | None = None,
        title: str | None = None,
        description: str | None = None,
        annotations: types.ToolAnnotations | None = None,
    ) -> Callable[[F], F]: ...

    def tool(
        self,
        function: F | None = None,
        /,
        *,
        name: str | None = None,
        title: str | None = None,
        description: str | None = None,
        annotations: types.ToolAnnotations | None = None,
    ) -> F | Callable[[F], F]:
        """Register a function as a tool: ``@tools.tool`` or ``@tools.tool(name=...)``.

        Raises:
            ValueError: the name is taken, or a sync function asks for `Progress`.
            TypeError: a parameter's type cannot be turned into a JSON schema.
        """

        def register(fn: F) -> F:
            self.add(fn, name=name, title=title, description=description, annotations=annotations)
            return fn

        return register(function) if function is not None else register

    def add(
        self,
        function: Callable[..., Any],
        *,
        name: str | None = None,
        title: str | None = None,
        description: str | None = None,
        annotations: types.ToolAnnotations | None = None,
    ) -> NativeTool:
        """Register ``function`` and return its tool (the non-decorator spelling of `tool`)."""
        tool_name = name or function.__name__
        if tool_name in self._tools:
            raise ValueError(f"tool {tool_name!r} is already registered")
        native = _describe(function, tool_name, title, description, annotations)
        self._tools[tool_name] = native
        return native

    def get(self, name: str) -> NativeTool | None:
        return self._tools.get(name)

    def definitions(self) -> list[types.Tool]:
        return [tool.definition for tool in self._tools.values()]


class NativeConnector:
    """Serves a `ToolSet` in-process with the same contract as the MCP connectors."""

    def __init__(self, spec: NativeSpec, toolset: ToolSet | None = None) -> None:
        """Load ``spec.target`` (``"package.module:attribute"``) unless ``toolset`` is given.

        Raises:
            ConnectorConfigError: the target cannot be imported or is not a ToolSet.
        """
        self.spec = spec
        self._toolset = toolset if toolset is not None else load_toolset(spec.target)
        self._state = "new"
        self._listeners: list[ChangeListener] = []
        self._in_flight: set[anyio.CancelScope] = set()

    @classmethod
    def from_toolset(cls, id: str, toolset: ToolSet, **spec_fields: Any) -> NativeConnector:
        """Build a connector around a ToolSet object (tests, the broker's demo tools)."""
        return cls(NativeSpec(id=id, target="<in-process>", **spec_fields), toolset)

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def capabilities(self) -> types.ServerCapabilities:
        return types.ServerCapabilities(tools=types.ToolsCapability(list_changed=False))

    def add_change_listener(self, listener: ChangeListener) -> None:
        self._listeners.append(listener)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Nothing to spawn; marks the connector usable. Idempotent.

        Raises:
            ConnectorClosed: after `aclose()`.
        """
        self._check_open()
        self._state = "running"

    async def aclose(self) -> None:
        """Cancel calls in flight (they raise `ConnectorClosed`). Idempotent."""
        self._state = "closed"
        for scope in list(self._in_flight):
            scope.cancel()

    async def list_tools(self) -> list[types.Tool]:
        self._check_open()
        return self._toolset.definitions()

    async def call_tool(
        self,
        name: str,
        arguments: Mapping[str, JSONValue],
        *,
        progress: ProgressCallback | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the Connector protocol's deadline
    ) -> types.CallToolResult:
        """Run the tool within the deadline; tool failures come back as ``is_error`` results.

        Raises:
            CallTimeout: the deadline passed; the tool was cancelled (or its thread abandoned).
            ConnectorClosed: the connector is closed, or was closed during the call.
            DownstreamError: no tool has that name (code -32602, as an MCP server answers).
        """
        self._check_open()
        tool = self._toolset.get(name)
        if tool is None:
            raise DownstreamError(f"unknown tool {name!r}", code=INVALID_PARAMS)
        limit = call_deadline(self.spec, timeout)
        with anyio.CancelScope() as closing:
            self._in_flight.add(closing)
            try:
                with anyio.move_on_after(limit):
                    return await tool.run(arguments, progress)
                raise CallTimeout(
                    f"tools/call to native '{self.id}' exceeded its {limit:g}s deadline"
                )
            finally:
                self._in_flight.discard(closing)
        raise ConnectorClosed(f"native connector '{self.id}' was closed during the call")

    async def list_resources(self) -> list[types.Resource]:
        self._check_open()
        return []

    async def list_resource_templates(self) -> list[types.ResourceTemplate]:
        self._check_open()
        return []

    async def read_resource(self, uri: str) -> types.ReadResourceResult:
        self._check_open()
        raise DownstreamError("native connectors have no resources", code=INVALID_PARAMS)

    async def list_prompts(self) -> list[types.Prompt]:
        self._check_open()
        return []

    async def get_prompt(
        self, name: str, arguments: Mapping[str, str] | None = None
    ) -> types.GetPromptResult:
        self._check_open()
        raise DownstreamError(f"unknown prompt {name!r}", code=INVALID_PARAMS)

    async def complete(
        self,
        ref: types.PromptReference | types.ResourceTemplateReference,
        argument: Mapping[str, str],
        context_arguments: Mapping[str, str] | None = None,
    ) -> types.Completion:
        self._check_open()
        return types.Completion(values=[], total=0, has_more=False)

    def _check_open(self) -> None:
        if self._state == "closed":
            raise ConnectorClosed(f"native connector '{self.id}' is closed")


def load_toolset(target: str) -> ToolSet:
    """Import ``"package.module:attribute"`` and check that it names a ToolSet.

    Raises:
        ConnectorConfigError: the target is malformed, cannot be imported, or is not a ToolSet.
    """
    module_name, sep, attribute = target.partition(":")
    if not sep or not module_name or not attribute:
        raise ConnectorConfigError(f"native target {target!r} is not 'package.module:attribute'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConnectorConfigError(
            f"native target module {module_name!r} cannot be imported"
        ) from exc
    value: object = module
    for part in attribute.split("."):
        value = getattr(value, part, None)
    if not isinstance(value, ToolSet):
        raise ConnectorConfigError(f"native target {target!r} is not a ToolSet")
    return value


def _describe(
    function: Callable[..., Any],
    name: str,
    title: str | None,
    description: str | None,
    annotations: types.ToolAnnotations | None,
) -> NativeTool:
    is_async = inspect.iscoroutinefunction(function)
    hints = get_type_hints(function, include_extras=True)
    fields: dict[str, Any] = {}
    progress_parameter: str | None = None
    for parameter in inspect.signature(function).parameters.values():
        hint = hints.get(parameter.name, Any)
        if hint is Progress:
            if not is_async:
                raise ValueError(f"tool {name!r}: only async tools can report Progress")
            progress_parameter = parameter.name
            continue
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            raise TypeError(f"tool {name!r}: *args and **kwargs cannot be described")
        default = ... if parameter.default is parameter.empty else parameter.default
        fields[parameter.name] = (hint, default)
    model = create_model(  # pyright: ignore[reportCallIssue, reportUnknownVariableType]
        f"{name}_arguments",
        __config__=ConfigDict(extra="forbid"),
        **fields,
    )
    schema = model.model_json_schema()  # pyright: ignore[reportUnknownMemberType]
    schema["type"] = "object"
    schema.pop("title", None)
    output_schema = None
    returns = hints.get("return")
    if inspect.isclass(returns) and issubclass(returns, BaseModel):
        output_schema = returns.model_json_schema()
    definition = types.Tool(
        name=name,
        title=title,
        description=description if description is not None else inspect.getdoc(function),
        input_schema=schema,
        output_schema=output_schema,
        annotations=annotations,
    )
    return NativeTool(definition, function, model, progress_parameter, is_async)  # pyright: ignore[reportUnknownArgumentType]


def _shape(value: object) -> types.CallToolResult:
    if isinstance(value, types.CallToolResult):
        return value
    if isinstance(value, str):
        return types.CallToolResult(content=[types.TextContent(type="text", text=value)])
    if value is None:
        return types.CallToolResult(content=[])
    try:
        plain = (
            value.model_dump(mode="json")
            if isinstance(value, BaseModel)
            else to_jsonable_python(value)
        )
    except PydanticSerializationError:
        logger.exception("native tool returned a value that is not JSON")
        return _error("tool returned a value that cannot be sent")
    structured: dict[str, Any] = plain if isinstance(plain, dict) else {"result": plain}
    text = json.dumps(plain, ensure_ascii=False)
    return types.CallToolResult(
        content=[types.TextContent(type="text", text=text)], structured_content=structured
    )


def _error(message: str) -> types.CallToolResult:
    return types.CallToolResult(
        content=[types.TextContent(type="text", text=message)], is_error=True
    )
