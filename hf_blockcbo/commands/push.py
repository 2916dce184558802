"""`hf-blockcbo push`: upload a pruned folder with a generated model card, in one commit."""

from __future__ import annotations

from argparse import ArgumentParser

from .base import BaseCommand, CommandInfo


class PushCommand(BaseCommand):
    COMMAND = CommandInfo(name="push", help="upload a pruned model (+ card, provenance, optional Hessian) to the Hub")

    @staticmethod
    def parse_args(parser: ArgumentParser) -> None:
        parser.add_argument("--model", required=True, help="folder written by `hf-blockcbo prune`")
        parser.add_argument("--repo", required=True, help="Hub repository, user/name")
        parser.add_argument("--hessian", help="also upload this Hessian artifact")
        parser.add_argument("--private", action="store_true", help="create the repository private")
        parser.add_argument("--revision", help="branch to commit to (created if missing)")
        parser.add_argument("--license", help="licence tag for the card (default: the base model's, when known)")
        parser.add_argument("--token", help="Hub token (default: HF_TOKEN or the saved login)")

    def run(self) -> int:
        from ..hub.publish import push_model

        a = self.args
        url = push_model(a.model, a.repo, a.private, a.revision, a.token, a.hessian, a.license)
        print(f"Pushed {a.model} to {a.repo}: {url}")
        return 0
