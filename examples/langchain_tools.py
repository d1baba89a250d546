"""toolvlm's tools in a LangChain program, offline: `python examples/langchain_tools.py IMAGE`.

What a chat model is offered (`convert_to_openai_tool`, which `bind_tools` uses), a scripted reply that calls
two tools (a real chat model's `AIMessage.tool_calls` look the same), and the `ToolMessage`s that go back: text
and image content blocks, `status`, and our `ToolOutput` as the artifact. One bad call shows LangChain refusing
arguments that do not match the schema, before the tool runs. The tools run on the default bundle's weights.
"""

from __future__ import annotations

import json
import sys

from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import ValidationError

from toolvlm.tools import registry
from toolvlm.tools.langchain import to_langchain


def main(image: str) -> None:
    """Offer the tools, run a scripted model's tool calls, print what comes back."""
    tools = {name: to_langchain(registry.get(name)) for name in ("grounding", "counter", "draw_boxes")}
    print(json.dumps(convert_to_openai_tool(tools["counter"])["function"]["parameters"], indent=1))
    messages = [HumanMessage("How many people are there, and where is the tree?")]
    # with a real model: llm.bind_tools(list(tools.values())).invoke(messages) returns such a message
    reply = AIMessage(
        content="",
        tool_calls=[
            {"name": "counter", "args": {"image": image, "phrase": "person"}, "id": "call_1"},
            {
                "name": "grounding",
                "args": {"image": image, "phrase": "the tree", "max_boxes": 1},
                "id": "call_2",
            },
            {"name": "grounding", "args": {"image": image, "phrase": ""}, "id": "call_3"},
        ],
    )
    messages.append(reply)
    for call in reply.tool_calls:
        result = tools[call["name"]].invoke({**call, "type": "tool_call"})
        blocks = [b["type"] for b in result.content] if isinstance(result.content, list) else ["text"]
        print(f"{call['id']} {call['name']}: status={result.status} blocks={blocks} text={result.text!r}")
        messages.append(result)
    try:
        tools["counter"].invoke({"image": image, "phrase": "person", "threshold": 3})
    except ValidationError as err:
        print(f"refused before the tool ran: {err.errors()[0]['loc']} {err.errors()[0]['msg']}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python examples/langchain_tools.py IMAGE")
    main(sys.argv[1])
