'use strict';
// Never loaded by Node: require('http') resolves to the core module first.
module.exports = require('node:http');
