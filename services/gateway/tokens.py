"""JWT access tokens: HS256 only, with exp, iat, iss, aud, sub and role required."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import jwt

ALGORITHMS = ["HS256"]
REQUIRED_CLAIMS = ["exp", "iat", "iss", "aud", "sub", "role"]


@dataclass(frozen=True)
class TokenUser:
    user_id: str
    username: str
    role: str


class TokenService:
    def __init__(
        self, *, secret: str, issuer: str, audience: str, ttl_s: int, cache_entries: int = 0
    ) -> None:
        self._secret = secret
        self.issuer = issuer
        self.audience = audience
        self.ttl_s = ttl_s
        # A token is immutable, so a verified one stays valid until its exp: remember it.
        self._verified: dict[str, tuple[TokenUser, float]] = {}
        self._cache_entries = cache_entries

    def verify_cached(self, token: str) -> TokenUser | None:
        """verify(), remembering good tokens until they expire (bounded memory)."""
        hit = self._verified.get(token)
        if hit is not None:
            if hit[1] > time.time():
                return hit[0]
            del self._verified[token]
        user, exp = self._decode(token)
        if user is not None and self._cache_entries:
            if len(self._verified) >= self._cache_entries:
                self._verified.clear()
            self._verified[token] = (user, exp)
        return user

    def issue(self, *, user_id: int, username: str, role: str, now: float | None = None) -> str:
        """A signed access token valid for `ttl_s` seconds."""
        issued = int(now if now is not None else time.time())
        claims = {
            "sub": str(user_id),
            "name": username,
            "role": role,
            "iat": issued,
            "exp": issued + self.ttl_s,
            "iss": self.issuer,
            "aud": self.audience,
            "jti": uuid.uuid4().hex,
        }
        return jwt.encode(claims, self._secret, algorithm=ALGORITHMS[0])

    def verify(self, token: str) -> TokenUser | None:
        """The token's user, or None for anything invalid, expired or forged."""
        return self._decode(token)[0]

    def _decode(self, token: str) -> tuple[TokenUser | None, float]:
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=ALGORITHMS,
                audience=self.audience,
                issuer=self.issuer,
                options={"require": REQUIRED_CLAIMS},
            )
        except jwt.PyJWTError:
            return None, 0.0
        sub, role = claims.get("sub"), claims.get("role")
        if not isinstance(sub, str) or not sub.isdigit() or role not in ("user", "admin"):
            return None, 0.0
        user = TokenUser(user_id=sub, username=str(claims.get("name", "")), role=role)
        return user, float(claims["exp"])
