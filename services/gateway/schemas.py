"""Gateway request and response models."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr

from services.common.jsontypes import NO_CONTROL_CHARACTERS


class LoginIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # A name is looked up in Postgres, whose text cannot hold NUL (IN-9 found it a 500).
    username: Annotated[
        StrictStr, Field(min_length=1, max_length=64, pattern=NO_CONTROL_CHARACTERS)
    ]
    password: Annotated[StrictStr, Field(min_length=1, max_length=1024)]


class TokenOut(BaseModel):
    access_token: str
    token_type: Literal["bearer"] = "bearer"  # noqa: S105 (a scheme name)
    expires_in: int
